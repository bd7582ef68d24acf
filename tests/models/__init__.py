"""Tests of models/: pure PyTorch, checkpoints, training and the offline tools."""
