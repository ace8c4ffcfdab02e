"""Host side of federated fine-tuning: the task (task.py), rounds over MQTT (server.py, secure_round.py),
the result bundle (result.py), the end-to-end run (run.py) and privacy accounting (accounting.py)."""
