"""jaxalign: align language models from demonstrations and preferences in JAX.

Importing the top-level package is deliberately light: subpackages load what they need, so that
``import jaxalign.losses`` pulls in nothing but jax and numpy.

- ``jaxalign.losses``   pure loss functions (SFT, Bradley-Terry/IRL, DPO family, SimPO, DIL, AfD)
- ``jaxalign.models``   the Llama/Mistral/Qwen and GPT-NeoX decoders, Hugging Face safetensors in and out
- ``jaxalign.sharding`` device mesh and logical-axis sharding rules
- ``jaxalign.sampling`` the in-process KV-cache sampler
- ``jaxalign.data``     dataset reading, normalisation, chat-template tokenisation, grain loaders
- ``jaxalign.train``    jitted, sharded train steps, optimizers, the phase loop
- ``jaxalign.pipeline`` phases and rounds (IRL, SPIN, online DPO, AfD)
"""

__version__ = "0.1.0"
