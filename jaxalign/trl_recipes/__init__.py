"""TRL and alignment-handbook recipe files run as written: their keys mapped to jaxalign's (docs/trl_users.md).

- :mod:`~jaxalign.trl_recipes.names`: the names, what is not applicable, what is refused, TRL's defaults;
- :mod:`~jaxalign.trl_recipes.training` / :mod:`~jaxalign.trl_recipes.data`: one handler per training / dataset key;
- :mod:`~jaxalign.trl_recipes.recipe`: which trainer, the translation, the printed table, the refusal message.
"""
