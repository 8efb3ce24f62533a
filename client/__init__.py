"""The Flower ClientApp side of privrec: local DP training, the privacy ledger, on-device use."""
