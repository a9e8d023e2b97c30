"""How jobs start: DeepSpeed configs, experiment YAMLs, the multi-node launcher, the demo and the CLI root."""
