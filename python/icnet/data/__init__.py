"""Datasets and augmentation for training and evaluating ICNet."""
