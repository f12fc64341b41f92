"""audioq worker: the heavy side that keeps Gemma 4 resident and runs audio jobs."""
