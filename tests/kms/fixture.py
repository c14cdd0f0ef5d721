"""Test fixtures in moto's KMS and IAM (loopback only), for the system tests in tests/kms.rs.

Usage: fixture.py ENDPOINT COMMAND [ARGS]
  create-key [ALIAS]            print the new key's ARN (and create alias/ALIAS for it)
  create-user NAME ACTION...    a user allowed ACTION... (e.g. kms:Encrypt) on "*";
                                print "ACCESS_KEY_ID SECRET_ACCESS_KEY"
  decrypt HEX KEY_ID ACCESS SECRET
                                unwrap a data key immuta wrapped (encryption context
                                immuta_key_id=KEY_ID) with the given credentials; print it in hex
  encrypt HEX KMS_KEY KEY_ID    wrap the data key HEX as immuta would for key id KEY_ID, with
                                KMS key KMS_KEY (what a forged key row would hold); print it in hex
Every call is one moto action; the IAM test counts them for INITIAL_NO_AUTH_ACTION_COUNT.
"""
import json
import sys

import boto3

REGION = "us-east-1"


def client(service, endpoint, access="testing", secret="testing"):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
    )


def main(endpoint, command, *args):
    kms = client("kms", endpoint)
    if command == "create-key":
        arn = kms.create_key(Description="immuta test key")["KeyMetadata"]["Arn"]
        if args:
            kms.create_alias(AliasName=f"alias/{args[0]}", TargetKeyId=arn)
        print(arn)
    elif command == "create-user":
        name, actions = args[0], list(args[1:])
        iam = client("iam", endpoint)
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17",
                  "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="immuta", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        print(key["AccessKeyId"], key["SecretAccessKey"])
    elif command == "decrypt":
        blob, key_id, access, secret = args
        kms = client("kms", endpoint, access, secret)
        plain = kms.decrypt(CiphertextBlob=bytes.fromhex(blob),
                            EncryptionContext={"immuta_key_id": key_id})["Plaintext"]
        print(plain.hex())
    elif command == "encrypt":
        plain, kms_key, key_id = args
        blob = kms.encrypt(KeyId=kms_key, Plaintext=bytes.fromhex(plain),
                           EncryptionContext={"immuta_key_id": key_id})["CiphertextBlob"]
        print(blob.hex())
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main(*sys.argv[1:])
