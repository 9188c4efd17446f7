"""Shared plumbing: registry, Sample/SampleList, config."""

