"""Training machinery: mesh, multi-process runtime, train state, optimizer, losses, SFT."""
