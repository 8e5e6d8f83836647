"""edgeqtl: split a vision-language model between an edge device and a server."""
__version__ = "0.1.0"
