"""The embedded example: the refund scenario's upstream servers and its policy bundle."""
