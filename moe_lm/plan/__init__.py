"""`moe-lm plan`: size a GPU job before it is queued, by rehearsing moe_lm's own training step on
fake tensors at the target world size (docs/plan.md).

  rehearsal.py   one rank of one layout: model, parallelisation, the trainer's step, evaluation,
                 sampling, checkpoint read-out; depth extrapolated from 1 and 2 block repeats
  fake.py        the fake process group and the dispatch mode that answers what fake tensors
                 cannot and counts FLOPs, traffic and a per-op roofline
  stand_in.py    what stands where a real job has a device, a launcher or data
  arithmetic.py  DDP's and DeepSpeed ZeRO's state and traffic, computed from the parameters
  routing.py     the routing assumption behind the routing counts' seam
  layouts.py     candidate layouts; planner.py: fit and recommendation; roofline.py: step time;
  gpus.py        GPU kinds; report.py: text and JSON; preflight.py: the check before step 1
"""
