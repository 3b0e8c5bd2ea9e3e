"""Training a job: the loop, the job as named steps, checkpoints, resume and sweep continuation."""
