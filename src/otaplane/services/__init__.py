"""Services: the rules of otaplane, free of any wire format."""
