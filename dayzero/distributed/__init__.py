"""Scale-out over torch.distributed: the sharding layout of a rank (layout.py), the collectives the
model calls (comm.py), process groups, local rank start-up and the followers' step loop
(runtime.py). Nothing here imports the model; engine/worker.py is what a rank runs."""
