"""Model stage: takes a Hugging Face causal LM; gives the elastic model (family adapters, search
space, importance ranking, sliced modules), block NLL scoring, and export/save/load of sub-networks.
"""
