"""A recipe's run: the phases (sft, sample, reward, policy, eval) and the round structures (IRL, SPIN, online DPO)
built from them. ``Pipeline(cfg).run()`` runs it; each phase kind is its own module taking one ``RunContext``."""
