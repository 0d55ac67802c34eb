"""ReconLoop backend: the service, the job store, the loop's stages, generators, Gaussian fitting, the CLI."""

__version__ = "0.1.0"
