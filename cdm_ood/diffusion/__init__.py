"""The paper's math: noise schedules, the classifier F(x), Algorithm 1's losses, the likelihood of
Theorem 3.2, the denoiser of Theorem 3.1, samplers, posterior samples and the ranking of restorations; pure
functions of a classifier callable and tensors."""
