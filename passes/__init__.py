"""draftopt.passes: torch.fx passes (issue: graph layer)."""
