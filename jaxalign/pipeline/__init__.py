"""Phases (sft, sample, reward, policy, eval) and the round structures (IRL, SPIN, online DPO) built from them."""
