echo "client tests: none yet"
