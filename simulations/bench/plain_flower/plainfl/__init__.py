"""plainfl: a plain Flower FedAvg app, the baseline of vs_plain_flower.py."""
