"""Pure ML pieces shared by features, training, evaluation and serving: no bus, no MLflow."""
