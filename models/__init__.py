"""Model definitions: the autoencoder (written once) and curves over any module."""
