#!/bin/sh
# Run once by the postgres image on an empty volume: a database and a user for MLflow (and one for its logins), the
# same for Optuna. The passwords reach psql as variables and go into the SQL as :'name', which psql quotes as a
# literal: a ' (or anything else) in a password is data, never SQL. The heredoc is quoted: the shell expands nothing.
set -eu
psql -v ON_ERROR_STOP=1 --username postgres \
     -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v optuna_pw="$OPTUNA_DB_PASSWORD" <<'SQL'
CREATE USER mlflow WITH PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE USER optuna WITH PASSWORD :'optuna_pw';
CREATE DATABASE optuna OWNER optuna;
SQL
