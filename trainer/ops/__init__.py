"""Workflow operations apart from the ML code: GCS handoff and emulator, cross-check, report, workflow config."""
