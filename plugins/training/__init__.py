"""Training-loop methods: reweighting, schedules and optimizer callbacks."""
