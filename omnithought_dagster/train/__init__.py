"""Student training: the SFT process (sft.py) and what is decided before it starts (launch.py)."""
