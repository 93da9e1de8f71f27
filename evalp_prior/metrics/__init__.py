"""Sample-quality metrics for latent priors."""
from evalp_prior.metrics.mmd import median_bandwidth, mmd2_unbiased

__all__ = ["median_bandwidth", "mmd2_unbiased"]
