pytest_plugins = ["checkpointer.testing.pytest_plugin"]
