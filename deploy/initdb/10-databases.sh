#!/bin/sh
# Run once by the postgres image on an empty volume: a database and a user for MLflow, the same for Optuna.
set -e
psql -v ON_ERROR_STOP=1 --username postgres <<SQL
CREATE USER mlflow WITH PASSWORD '${MLFLOW_DB_PASSWORD}';
CREATE DATABASE mlflow OWNER mlflow;
CREATE USER optuna WITH PASSWORD '${OPTUNA_DB_PASSWORD}';
CREATE DATABASE optuna OWNER optuna;
SQL
