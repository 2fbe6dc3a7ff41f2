"""Meta-reinforcement learning building blocks: JAX environments, policies, on-device rollouts, REINFORCE."""
