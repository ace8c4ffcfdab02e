"""Federated fine-tuning of a model head on the device: aggregation, differential privacy and secure aggregation."""
