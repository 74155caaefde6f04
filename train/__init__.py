"""The fastpmd trainer (imported as fastpmd.train)."""
