"""Host side of federated fine-tuning: privacy accounting."""
