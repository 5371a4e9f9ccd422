"""Stand-ins for services that cannot run here (they speak the real protocols)."""
