"""The fault matrix (issue 7): where a fault strikes, crossed with what the fault is."""
