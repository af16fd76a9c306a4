"""ControlNet: the preprocessors that turn a picture into a control map, and what uses those maps."""
