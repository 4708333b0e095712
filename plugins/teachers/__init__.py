"""Teachers: momentum networks, queues and memory banks."""
