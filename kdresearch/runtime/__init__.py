"""The process a job runs in: device, data-parallel world, signals, file locks."""
