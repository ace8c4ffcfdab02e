"""Building for a device profile: load the model, convert, compress, estimate, measure, pick, fill the manifest."""
