"""liger_plugins: put liger_kernels into Hugging Face models and the frameworks that train them."""

__version__ = "0.1.0"
