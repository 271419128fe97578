"""Training stage: takes an elastic model, token blocks and routers; gives trained weights and routers
(elastic training, router training through the surrogate, joint fine-tuning, dynamic routers), resumable.
"""
