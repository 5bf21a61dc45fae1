"""Training: optimizer, sharded train state, the jitted steps, checkpoints, metrics and the loop.

    from meshlm.train.loop import train
    summary = train(cfg)
"""
