"""Map `FederationConfig.strategy` onto Flower's own strategies."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from medae_core.config import FederationConfig


def build_strategy(fed: FederationConfig) -> Strategy:
    """Build the configured strategy; every site that is connected trains by default."""
    common = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
    )
    if fed.strategy == "fedavg":
        return FedAvg(**common)
    if fed.strategy == "fedprox":
        return FedProx(**common, proximal_mu=fed.proximal_mu)
    if fed.strategy == "fedadam":
        return FedAdam(**common, eta=fed.server_lr)
    if fed.strategy == "fedmedian":
        return FedMedian(**common)
    if fed.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=fed.trim_beta)
    raise ValueError(f"unknown strategy {fed.strategy!r}")  # config validation prevents this
