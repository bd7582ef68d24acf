"""rnnserve's model family: pure PyTorch, knows nothing about serving."""
