"""Small helpers every stage uses: typed configuration, atomic files, local Ray on loopback."""
