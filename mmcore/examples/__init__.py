"""Worked use cases that ship with mmcore (models, data and registered trainers)."""
