"""Training losses, one module per method; `base` holds the contract they share.

Configs name a loss by its class path (`_target_: kdresearch.losses.kd.SoftTargetKD`): Hydra's
`_target_` is the registry, nothing is registered on import.
"""
