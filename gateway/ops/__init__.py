"""What operators and other tools reach: the HTTP port, diagnostics, the dead-letter tools and the
contract artifacts."""
