"""Miners choose the pairs or triplets a loss trains on; pass their output as the loss's ``indices_tuple``."""

from objretrieval.miners.base import Mined, MinedPairs, MinedTriplets, Miner
from objretrieval.miners.distance_weighted import DistanceWeightedMiner
from objretrieval.miners.multi_similarity import MultiSimilarityMiner
from objretrieval.miners.triplet_margin import TripletMarginMiner

__all__ = [
    "DistanceWeightedMiner",
    "Mined",
    "MinedPairs",
    "MinedTriplets",
    "Miner",
    "MultiSimilarityMiner",
    "TripletMarginMiner",
]
