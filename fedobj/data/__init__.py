"""Data: Fashion-MNIST, image folders, partitioners and a node's own data."""
