"""Generated from protos/ by `python -m tools.protogen`. Do not edit."""
